"""The page (``--serve``): a Gradio page over a loaded model, and what it does with the model (``actions``)."""
