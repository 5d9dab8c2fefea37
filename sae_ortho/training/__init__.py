"""Pipeline step 3: the SAE, its sparse training step, the orthogonality loss and its pair
selector, the trainer (stages train*, synthetic*)."""
