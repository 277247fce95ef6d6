"""Using a trained model: the schedule's samplers, the loaded model, drawing images, editing them, and the commands over a checkpoint."""
