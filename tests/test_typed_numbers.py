"""No typed measurements on the pages (issue #18).

Every number on a page next to a unit (GB, GiB, MB, MiB, tok/s, tokens/s, %, bpw, bits per weight,
ms, s, minutes, TB/s, ×, ...) must be one of:

(a) a published number, its source cited on the same line or in the same sentence or table row
    (a Markdown link ``](http``, a ``{cite}`` role or a footnote ``[^``);
(b) arithmetic shown on the page, its inputs given;
(c) a definition by construction;
(d) glued from the executed notebook (a myst-nb ``{glue}`` role).

The scanner reads every page's prose (not code blocks, inline code, link targets or directive options)
and accepts (a) and (d) by themselves, and (b) when the number's sentence shows the computation (an
"=" or "≈" followed by a number). What is left is a number typed into the text: it fails, unless it is
listed in ``ALLOWED`` with the reason it may stay ((c), a setting one chooses, an exercise's givens).
Keep that list small: a figure the lesson's own notebooks measured belongs in (d), or out of the prose.
"""

import re
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "content").glob("*.md")) + [ROOT / "index.md"]

# A number (digits, optional decimals or thousands separators, optional range "2–4"), then a unit.
NUMBER = r"(?:(?<![\w.\-/])\d+(?:[.,]\d+)*|\b(?:tens|hundreds|thousands) of)"
SPACE = r"(?:\s|\\,|~|\u00a0|\u202f|\u2009)*"
UNITS = [
    r"GiB", r"MiB", r"KiB", r"TiB", r"GB", r"MB", r"kB", r"KB", r"TB",
    r"TB/s", r"GB/s", r"tok/s", r"tokens?/s", r"tokens? per second",
    r"\\?%", r"percent",
    r"bpw", r"bits? per weight", r"bits/weight", r"bits? per parameter",
    r"ms", r"s", r"sec(?:onds?)?", r"min(?:utes?)?", r"h", r"hours?", r"µs", r"μs", r"microseconds?",
    r"[MB][- ]?param(?:eter)?s?", r"(?:million|billion)[- ]param(?:eter)?s?",
]
# "×" right after a number is a factor ("1.88×"); "4 × A100" and LaTeX's \times are multiplication.
TIMES = r"×(?!\s*[\d(])"
UNIT = "(?:" + "|".join(sorted(UNITS, key=len, reverse=True)) + ")"
RANGE = rf"{NUMBER}(?:{SPACE}(?:–|-|to){SPACE}{NUMBER})?"
HIT = re.compile(rf"{RANGE}(?:{SPACE}{UNIT}(?![\w/])|{TIMES})")
# What makes a number sourced: a link to the source, a citation, a footnote, or a glue role.
SOURCED = re.compile(r"\]\(https?://|\{cite(?::\w+)?\}|\[\^|\{glue(?::\w+)?\}")

# (b) found by itself: arithmetic shown in the same sentence, an "=" or "≈" followed by a number.
ARITHMETIC = re.compile(r"(?:=|≈|\\approx)\s*\$?\s*\d")

# Fenced blocks whose content is prose (directives), scanned like the page; all other fences are code.
PROSE_DIRECTIVES = {
    "note", "warning", "callout", "tip", "important", "glossary", "admonition", "exercise", "solution",
    "questions", "objectives", "keypoints", "prereq", "discussion", "instructor-note", "tab-item", "tab-set",
    "seealso", "hint", "caution", "danger", "attention", "error",
}

# Numbers typed on purpose, with the reason each may stay: (page glob, regular expression matching the
# whole number-and-unit as the failure message prints it) -> why. For (b) arithmetic shown elsewhere
# than in the number's own sentence, (c) definitions by construction, settings and an exercise's givens.
ALLOWED = {
    ("index.md", r"\d+ min"): "the schedule: planned teaching time per episode, chosen, not measured",
    ("content/instructor-guide.md", r"\d+ (h|min)"):
        "the schedules: planned teaching and break times, and their totals, which are sums of the rows shown",
    ("*", r"4\.2 M[- ]param(eter)?s?"): "the embedded model's size follows from its definition (Recipe in "
        "src/quantlesson/embedded.py): 4096 × 256 tied embeddings + 4 layers × 786,944 + 256 = 4,196,608",
    ("content/01-why-quantize.md", r"80 GB"): "exercise 1.1's given: the size of the GPU to plan for",
    ("content/04-awq.md", r"99 %|1 %"): "the share of channels kept in 16 bits in AWQ's experiment: a "
        "setting of the experiment, from the paper linked where the experiment is introduced",
    ("content/06-gguf.md", r"4\.5 bits per weight"): "Q4_0 by construction, (32 × 4 + 16) / 32, as the "
        "page derives it; the objective names it before the derivation",
    ("content/06-gguf.md", r"[641] GB"): "exercise 6.1's givens: the memory budgets to plan for",
    ("content/07-exl2.md", r"(2\.5 to 6\.0|2\.5|3\.25|4\.0|5\.0|6\.0) (bits per weight|bpw)"):
        "EXL2 target bitrates: settings one chooses (convert_exl2 -b), not measurements",
    ("content/07-exl2.md", r"(48|24|12|6|2) GB"): "exercise 7.1's givens: the GPU sizes and reserves to plan for",
    ("content/08-which-method.md", r"4\.25 bits per weight"): "the int4 format by construction, "
        "4 + (16 + 16) / 128, shown in the callout; the exercise reuses it",
    ("content/08-which-method.md", r"32 bits per weight"): "float32 is 32 bits per number by definition",
    ("content/08-which-method.md", r"(80|24|16) GB"): "exercise 8.4's givens: the hardware of each case",
    ("content/09-hpc.md", r"4 hours"): "exercise 9.1's given: the time limit to try",
    ("content/08b-kernels.md", r"10 %"): "the threshold the notebook's claims check asserts on the data "
        "(batch 16: no 4-bit path 10 % faster than bfloat16), a setting of the check, not a measurement",
    ("content/08b-kernels.md", r"(3\.9|15) GB"): "exercise 8b.3's givens: round sizes of a step's weights to plan with",
}


def _strip_inline(line):
    """Remove what is not prose from a line: inline code, link targets, roles' targets."""
    line = re.sub(r"`[^`]*`", lambda m: "`" + " " * (len(m.group()) - 2) + "`", line)
    line = re.sub(r"\]\([^)]*\)", lambda m: "](" + " " * (len(m.group()) - 3) + ")", line)
    return line


def blocks(text):
    """Yield lists of (line number, line) for each unit of prose: a paragraph, a list item or a table row.

    Fenced code blocks and directive options are left out.
    """
    block = []
    fence = None  # the closing fence of the code block we are in
    prose_fences = []  # the closing fences of the prose directives (in backticks) we are in
    in_options = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if fence is not None:
            if stripped == fence:
                fence = None
            continue
        opening = re.match(r"^(`{3,}|~{3,}|:{3,})\s*(?:\{([\w:-]+)\})?", stripped)
        if opening:
            if block:
                yield block
                block = []
            marks, directive = opening.group(1), opening.group(2)
            in_options = directive is not None
            if marks[0] == ":":
                continue
            if stripped == marks and prose_fences and prose_fences[-1] == marks:
                prose_fences.pop()
            elif directive in PROSE_DIRECTIVES:
                prose_fences.append(marks)
            else:
                fence = marks
            continue
        if in_options and re.match(r"^:[\w-]+:", stripped):
            continue
        in_options = False
        if stripped == "" or stripped.startswith("$$"):
            if block:
                yield block
                block = []
            continue
        starts_item = re.match(r"^(\s*)([-*+]|\d+\.)\s", line) or stripped.startswith("|")
        if starts_item and block:
            yield block
            block = []
        block.append((number, line))
        if stripped.startswith("|"):
            yield block
            block = []
    if block:
        yield block


# A sentence ends at ".", "?" or "!" before a space, except after "e.g.", "i.e.", "vs.", "et al.".
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bal)[.?!](?=\s)")


def claims(line):
    """The numbers with units in one line of prose, as (claim, start, end)."""
    matches = HIT.finditer(_strip_inline(line))
    return [(re.sub(r"\s+", " ", m.group()).strip(), m.start(), m.end()) for m in matches]


def allowed(page, claim):
    """Whether ALLOWED lists this number and unit for this page."""
    return any(fnmatch(page, pattern) and re.fullmatch(numbers, claim) for pattern, numbers in ALLOWED)


def typed_numbers(text, page="page"):
    """(line number, number with unit) for every number with a unit whose sentence or line cites nothing."""
    found = []
    for block in blocks(text):
        joined, plain, starts = "", "", []
        for _, line in block:
            starts.append(len(joined))
            joined += line + "\n"
            plain += _strip_inline(line) + "\n"
        ends = [m.end() for m in SENTENCE_END.finditer(plain)] + [len(joined)]
        for (number, line), start in zip(block, starts):
            if SOURCED.search(line):
                continue
            for claim, begin, end in claims(line):
                if allowed(page, claim):
                    continue
                sentence_start = max([0] + [e for e in ends if e <= start + begin])
                sentence_end = min(e for e in ends if e >= start + end)
                if SOURCED.search(joined[sentence_start:sentence_end]):
                    continue
                if ARITHMETIC.search(plain[sentence_start:sentence_end]):
                    continue
                found.append((number, claim))
    return found


def test_scanner_flags_a_typed_number_and_passes_a_sourced_one():
    assert typed_numbers("The model is 12.3 GB after quantization.\n") == [(1, "12.3 GB")]
    assert typed_numbers("It is 12.3 GB ([source](https://example.org/paper)).\n") == []
    assert typed_numbers("It is 12.3 GB {cite}`paper`.\n") == []
    assert typed_numbers("It runs at {glue:text}`speed` tok/s, 1.88× faster.\n") == []
    # the other units, a range, and the forms seen on pages
    text = "It took 5–15 minutes; 63 % of the bound, 3.06 bpw, 1.88×, 4.5 bits per weight, 48 tok/s.\n"
    assert [claim for _, claim in typed_numbers(text)] == [
        "5–15 minutes", "63 %", "3.06 bpw", "1.88×", "4.5 bits per weight", "48 tok/s",
    ]
    # a source elsewhere in the sentence counts; one in another sentence or paragraph does not
    assert typed_numbers("Speed 4.8 TB/s\n(the [datasheet](https://x.org)).\n") == []
    assert typed_numbers("Speed 4.8 TB/s. The\n[datasheet](https://x.org).\n") == [(1, "4.8 TB/s")]
    assert typed_numbers("Speed 4.8 TB/s.\n\nThe [datasheet](https://x.org).\n") == [(1, "4.8 TB/s")]
    # multiplication is not a factor; spelled-out magnitudes count too
    assert [c for _, c in typed_numbers("4 × A100, $2 \\times n$, 2× faster, tens of microseconds\n")] == [
        "2×", "tens of microseconds",
    ]
    # arithmetic shown in the sentence is (b)
    assert typed_numbers("8 B parameters × 2 bytes = 16 GB. Then 16 GB again.\n") == [(1, "16 GB")]
    assert typed_numbers("It is $70 \\times 10^9 \\times 2.5 / 8 \\approx 22$ GB, on a 24 GB GPU.\n") == []
    # each list item and table row stands alone
    assert typed_numbers("- 2 GB [a](https://x.org)\n- 3 GB\n") == [(2, "3 GB")]
    assert typed_numbers("| a | 2 GB | [a](https://x.org) |\n| b | 3 GB | |\n") == [(2, "3 GB")]
    # code blocks, inline code, directive options and link targets are not prose
    assert typed_numbers("```python\nx = '12 GB'\n```\nuse `-b 4.0 s`\n") == []
    assert typed_numbers(":::{note}\n:class: 5 GB\nSee [x](https://x.org/v2/3 GB).\n:::\n") == []
    # prose inside a directive is scanned
    assert typed_numbers(":::{note}\nIt is 5 GB.\n:::\n") == [(2, "5 GB")]


def test_no_typed_numbers_on_the_pages():
    problems = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for number, claim in typed_numbers(page.read_text(), name):
            problems.append(f"{name}:{number}: {claim}")
    assert not problems, (
        "Numbers with units typed without a source (issue #18). For each: cite the source on the line or in "
        "the sentence (a link, {cite} or a footnote), glue it from the notebook ({glue}), or show the "
        "arithmetic in the sentence (inputs, then = or ≈). Only a definition by construction, a setting or an "
        "exercise's given may instead go into ALLOWED in tests/test_typed_numbers.py, with its reason:\n  "
        + "\n  ".join(problems)
    )


def test_every_allowed_entry_is_still_on_its_page():
    """A stale allowance would let the same number back in unseen elsewhere; keep the list exact."""
    everything = {}
    for page in PAGES:
        lines = [line for block in blocks(page.read_text()) for _, line in block]
        everything[page.relative_to(ROOT).as_posix()] = [claim for line in lines for claim, _, _ in claims(line)]
    for (pattern, numbers), reason in ALLOWED.items():
        assert len(reason.split()) >= 5, f"{pattern}: {numbers} needs a reason"
        used = [c for name, found in everything.items() if fnmatch(name, pattern) for c in found
                if re.fullmatch(numbers, c)]
        assert used, f"ALLOWED lists {numbers!r} on {pattern}, which is no longer there: remove it"
