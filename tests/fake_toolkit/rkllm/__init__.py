"""A fake rkllm-toolkit package for tests (see tests/fake_toolkit/README.md)."""
