"""World 2: 48x48 scenes whose objects carry two-colour patterns with an accent colour no caption names.

It replaces the 32x32 world (perfusion/world/scenes.py) once its mini model is trained (docs/world.md):
an instance's look (pattern + body colour + accent colour) is then something no words can ask for, so
identity has to travel through the concept's learned values, and the reader (analyze.py here) decides
identity from the object's spatial structure, never from its mean colour.
"""
