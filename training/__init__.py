"""Training of the tiny MiMo checkpoint: text corpus, synthetic dialogues, tokenizer and model training."""
