"""The hooks a plugin implements and how plugins are found (entry points, one registry per kind)."""
