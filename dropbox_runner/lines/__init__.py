"""Request lines: parsing and field rules for chat, completions, embeddings, Responses and
score/rerank lines."""
