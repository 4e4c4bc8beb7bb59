"""What the stages share that is not a stage's concept: the command line, its one-line errors and Ctrl-C
(`harness`), timing and comparison (`timing`), weights and files (`weights`, `files`), the optional prompt
and video ends (`extras`). Stages import it with plain imports (`from support import harness`); nothing here
imports a stage, is handed one or reads a stage's names (tests/test_support.py checks)."""
