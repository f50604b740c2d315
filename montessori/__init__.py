"""Montessori-Instruct: a teacher LLM learns, by DPO, to write data that helps one student."""

__version__ = "0.1.0"
