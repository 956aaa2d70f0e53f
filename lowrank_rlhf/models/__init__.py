"""Models: base loading (4bit | 8bit | none), built-in models, random LLaMA shapes, and the role adapters."""
