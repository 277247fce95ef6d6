"""Reading images: finding them in any folder layout, decoding them once into a cache, the batches training
draws, and the AFHQ download."""
