"""The LoRA Autoscaler API: typed resources, defaults and schemas, from one source."""
