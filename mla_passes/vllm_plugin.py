"""vLLM general plugin entry point (placeholder; filled in by issue 4)."""


def register() -> None:
    return None
