"""snd.cache"""
