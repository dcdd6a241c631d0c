"""Documents → chunks → embeddings → index → search. Imports nothing from finetune or pipeline."""
