"""Using a trained model: the samplers, the loaded model, drawing images, editing them, and the commands over a
checkpoint."""
