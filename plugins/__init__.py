"""kdkit's built-in plugins, registered through the ``kdkit`` entry-point group like any other."""
