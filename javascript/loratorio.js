// LoRAtorio needs no custom JavaScript: its UI is plain Gradio. The file keeps the standard extension layout.
