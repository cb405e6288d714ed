"""End-to-end demonstrations run by `sid-fast demo`."""
