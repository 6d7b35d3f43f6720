/* LD_PRELOAD this to print a native backtrace when the process crashes (SIGSEGV, SIGABRT, SIGILL, SIGBUS). */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <ucontext.h>

static void report(int sig, siginfo_t *info, void *context) {
  void *frames[64];
  int n = backtrace(frames, 64);
  dprintf(2, "\n*** signal %d (%s) at address %p; native backtrace:\n", sig, strsignal(sig), info->si_addr);
  backtrace_symbols_fd(frames, n, 2);
  FILE *maps = fopen("/proc/self/maps", "r");
  char line[512];
  dprintf(2, "*** executable mappings:\n");
  while (maps && fgets(line, sizeof line, maps)) if (strstr(line, "r-xp")) dprintf(2, "%s", line);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = report;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  int signals[] = {SIGSEGV, SIGABRT, SIGILL, SIGBUS, SIGFPE};
  for (unsigned i = 0; i < sizeof signals / sizeof *signals; i++) sigaction(signals[i], &action, NULL);
}
