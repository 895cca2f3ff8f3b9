"""A miniature ComposLoRA that trains and evaluates on a CPU: generator, tiny text-to-image model, LoRAs, judge."""
