"""snd.splat"""
