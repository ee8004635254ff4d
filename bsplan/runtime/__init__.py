"""What runs inside the user's training loop: AutoBatch. Imports the layers below it."""
