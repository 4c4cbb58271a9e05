"""The built-in shapes world: prompts, renderer, defects, styles, masks and the annotator."""
