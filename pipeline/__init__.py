"""Generation, the chat API, evaluation and the `raglora` CLI."""
