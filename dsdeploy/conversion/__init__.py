"""Conversion: the DS decomposition (pure math), the DS block, planning, the rewrite, op counting, the .dsd artifact."""
