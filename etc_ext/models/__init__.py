"""Hugging Face model integrations of ETC: `etc_ext.models.llava` (LLaVA-1.5), `etc_ext.models.qwen3_vl` (Qwen3-VL)."""
