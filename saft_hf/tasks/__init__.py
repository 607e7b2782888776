"""Task definitions, one place each: vision (CLIP 8 tasks), GLUE text-to-text, the offline text demo."""
