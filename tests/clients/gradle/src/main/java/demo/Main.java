package demo;

public final class Main {
    public static void main(String[] args) {
        System.out.println(new Greeter("sluice").greeting());
    }
}
