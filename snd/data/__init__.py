"""snd.data"""
