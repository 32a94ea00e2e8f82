"""Hugging Face model integrations of ETC: `etc_ext.models.llava` (LLaVA-1.5)."""
