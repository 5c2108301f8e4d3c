"""One module per op family: the API function, its primitive and the primitive's rules."""
