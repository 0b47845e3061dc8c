"""snd.stages"""
