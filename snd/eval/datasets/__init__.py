"""snd.eval.datasets"""
