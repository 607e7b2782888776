"""Built-in merge methods, one module each. Every module here (names not starting with "_") is
imported on the first registry lookup and registers its method; adding a method = adding a file
(see docs/extending.md)."""
