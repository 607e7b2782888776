"""Worker scripts launched by the multi-process trainer tests, plus the hand-written SAM reference."""
