"""`semfl bench`: speed and memory of the engines, written as JSON and Markdown."""
