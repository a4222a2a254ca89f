"""Checkpoints: Hugging Face import (`hf_import`) and statejax's own orbax save/restore
(`orbax_io`)."""
