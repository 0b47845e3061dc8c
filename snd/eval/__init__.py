"""snd.eval"""
