package demo;

public final class Greeter {
    private final String name;

    public Greeter(String name) {
        this.name = name;
    }

    public String greeting() {
        return "hello, " + name;
    }
}
