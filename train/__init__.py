"""Student side: export, data formatting, LoRA fine-tuning, merge and sampling (see DESIGN.md)."""
