"""Where the log-count example reads and writes (the job's mappings)."""

import os

INPUT = os.environ.get("INPUT_DIR", "/home/input")
OUTPUT = os.environ.get("OUTPUT_DIR", "/home/output")
DATA = "log-count-data.txt"
PARTS = 3
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")
