"""OpenAI-compatible gateway: schemas, chat rendering, reasoning and tool-call parsing, streaming."""
