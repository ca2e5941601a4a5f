"""What may come next over a vocabulary: canonical tokenization (more constraint modules move here)."""
