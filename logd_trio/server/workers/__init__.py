"""`logd serve --workers N`: worker processes that serve reads beside the owning process."""
