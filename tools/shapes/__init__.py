"""Training the built-in ``builtin:shapes`` toy model: its data, tokenizer and training loop
(``python -m tools.shapes.train``)."""
