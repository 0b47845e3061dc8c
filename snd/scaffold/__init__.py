"""snd.scaffold"""
