"""Demos: the spectrum monitor (mq demo) and the stream demo (mq stream-demo)."""
