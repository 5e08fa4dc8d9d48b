"""Text in and out of token ids: tokenizer.py, chat_template.py, eos.py (the one EOS rule)."""
