def greet(name):
    print("hello from a verified app, " + name)
