"""The quantizers written from scratch, one short module per method.

Each is the code the lesson's pages show and the tests check against the
maintained library that implements the same method.
"""
