"""Remote code shipped inside SA exports; these files depend on torch and transformers only."""
