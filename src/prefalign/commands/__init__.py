"""Command groups of the ``prefalign`` CLI, one module each; ``prefalign.cli`` assembles them."""
