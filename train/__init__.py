"""The student side, as a library with no command of its own: formatting, packing, LoRA set-up,
evaluation passes and statistics, distillation. The commands that drive it live in pipeline/stages/."""
